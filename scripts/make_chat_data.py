"""Builds the chat demo's data from the Shakespeare corpus: conversations asking which play
a line comes from (for SFT) and preference pairs whose chosen answer is the right play and
whose rejected answer is another play (for DPO). Deterministic (seeded)."""
import glob, json, os, random, sys

corpus, out_dir = sys.argv[1], sys.argv[2]
rng = random.Random(1337)
plays = {}
for path in sorted(glob.glob(os.path.join(corpus, "*_gut.txt"))):
    name = os.path.basename(path)[: -len("_gut.txt")]
    title = " ".join(w.capitalize() for w in name.split("_"))
    lines = [l.strip() for l in open(path, encoding="utf-8")]
    # Speech lines: long enough to say something, not stage directions or speaker tags.
    speech = [l for l in lines if len(l.split()) >= 6 and not l.isupper() and not l.startswith(("[", "Enter", "Exit", "Exeunt"))]
    if len(speech) >= 80:
        plays[title] = speech
titles = sorted(plays)
question = "Which play is this line from? \"{}\""
conversations, pairs = [], []
for title in titles:
    # Disjoint lines for SFT and DPO, so DPO's held-out pairs are unseen lines.
    lines = rng.sample(plays[title], 75)
    for line in lines[:60]:
        conversations.append({"messages": [{"role": "user", "content": question.format(line)},
                                           {"role": "assistant", "content": f"It is from {title}."}]})
    for line in lines[60:]:
        wrong = rng.choice([t for t in titles if t != title])
        pairs.append({"prompt": question.format(line), "chosen": f"It is from {title}.", "rejected": f"It is from {wrong}."})
rng.shuffle(conversations)
rng.shuffle(pairs)
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, "sft.jsonl"), "w") as f:
    f.writelines(json.dumps(c) + "\n" for c in conversations)
with open(os.path.join(out_dir, "pairs.jsonl"), "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs)
print(f"{len(conversations)} conversations and {len(pairs)} preference pairs over {len(titles)} plays")
