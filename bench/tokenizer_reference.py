"""Python `tokenizers` doing what `lillm tokenizer train` and `lillm data prepare` do, timed,
for `make bench`. Prints JSON: training seconds and prepare MB/s."""
import glob, json, sys, time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

corpus_dir, vocab, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t_read = time.perf_counter()
files = sorted(glob.glob(f"{corpus_dir}/*.txt"))
docs = []
for f in files:
    paragraphs = open(f, encoding="utf-8").read().split("\n\n")
    docs += [p.strip("\n") for p in paragraphs if p.strip()]

specials = ["<unk>", "<s>", "</s>"] + [f"<r{i}>" for i in range(13)]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(docs, trainer=trainer)
tok.save(out + ".tokenizer.json")
# Like `lillm tokenizer train`: reading the files, training and saving.
train_s = time.perf_counter() - t_read

t0 = time.perf_counter()
ids = []
for enc in tok.encode_batch(docs, add_special_tokens=False):
    ids.extend(enc.ids)
    ids.append(2)
np.asarray(ids, dtype=np.uint16).tofile(out)
prep_s = time.perf_counter() - t0
text_mb = sum(len(d.encode()) for d in docs) / 1e6
print(json.dumps({"train_s": train_s, "prepare_mb_per_s": text_mb / prep_s, "tokens": len(ids)}))
