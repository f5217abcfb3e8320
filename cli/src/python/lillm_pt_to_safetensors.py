"""Convert an original lilLM checkpoint (torch.save dict with `model` and `config`) into
model.safetensors + config.json. Run by `lillm import lillm-pt`; needs torch and safetensors.

Unpickling only resolves torch, collections and copyreg classes; anything else (such as the
original `model.config.Config` dataclass) becomes a plain attribute holder, so the file's
config is read without importing the original code and without running arbitrary callables.
"""
import json
import pickle
import sys
import types

import torch
from safetensors.torch import save_file

ALLOWED = ("torch", "collections", "copyreg", "builtins", "numpy", "_codecs")


class Placeholder:
    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and state and isinstance(state[-1], dict):
            self.__dict__.update(state[-1])


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] in ALLOWED and not (module == "builtins" and name in ("eval", "exec", "getattr", "__import__", "open")):
            return super().find_class(module, name)
        return Placeholder


pickle_module = types.ModuleType("lillm_safe_pickle")
pickle_module.Unpickler = Unpickler
pickle_module.load = lambda f, **kw: Unpickler(f, **kw).load()
pickle_module.__dict__["loads"] = pickle.loads


def main(src, out_dir):
    ckpt = torch.load(src, map_location="cpu", weights_only=False, pickle_module=pickle_module)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        sys.exit(f"{src}: not a lilLM checkpoint (expected a dict with a `model` state dict)")
    state = {}
    for key, tensor in ckpt["model"].items():
        name = key[len("_orig_mod."):] if key.startswith("_orig_mod.") else key
        state[name] = tensor.detach().to(torch.float32).contiguous()
    head = state.pop("lm_head.weight", None)
    if head is not None and "tok_emb.weight" in state and not torch.equal(head, state["tok_emb.weight"]):
        sys.exit(f"{src}: lm_head.weight differs from tok_emb.weight; lilLM ties them")
    if head is not None and "tok_emb.weight" not in state:
        state["tok_emb.weight"] = head
    config = ckpt.get("config")
    fields = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    fields = {k: v for k, v in fields.items() if isinstance(v, (int, float, type(None)))}
    save_file(state, f"{out_dir}/model.safetensors")
    with open(f"{out_dir}/config.json", "w") as f:
        json.dump({"config": fields, "num_iter": ckpt.get("num_iter"), "best_val_loss": ckpt.get("best_val_loss")}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
