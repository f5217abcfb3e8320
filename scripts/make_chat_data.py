"""Builds the chat demo's data from the Shakespeare corpus. SFT: conversations asking to
continue a line, answered with the line that really follows it. DPO: the same question with
the true next line as the chosen reply and that line with its words shuffled as the rejected
one. SFT and DPO use disjoint lines; everything is seeded."""
import glob, json, os, random, sys

corpus, out_dir = sys.argv[1], sys.argv[2]
rng = random.Random(1337)
couplets = []
for path in sorted(glob.glob(os.path.join(corpus, "*_gut.txt"))):
    lines = [l.strip() for l in open(path, encoding="utf-8")]
    for a, b in zip(lines, lines[1:]):
        # Two consecutive verse lines of one speech: not speaker tags or stage directions.
        if all(4 <= len(x.split()) <= 12 and not x.isupper() and not x.startswith(("[", "Enter", "Exit", "Exeunt")) for x in (a, b)):
            couplets.append((a, b))
rng.shuffle(couplets)
sft_part, dpo_part = couplets[:3000], couplets[3000:3600]
question = "Continue this line: {}"
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, "sft.jsonl"), "w") as f:
    for a, b in sft_part:
        f.write(json.dumps({"messages": [{"role": "user", "content": question.format(a)}, {"role": "assistant", "content": b}]}) + "\n")


def shuffled(line):
    words = line.split()
    while True:
        rng.shuffle(words)
        if " ".join(words) != line:
            return " ".join(words)


with open(os.path.join(out_dir, "pairs.jsonl"), "w") as f:
    for a, b in dpo_part:
        f.write(json.dumps({"prompt": question.format(a), "chosen": b, "rejected": shuffled(b)}) + "\n")
print(f"{len(sft_part)} conversations and {len(dpo_part)} preference pairs from {len(couplets)} couplets")
