"""Nothing in the project can execute code from a file a user got from elsewhere: no pickle
module, every torch.load is weights_only=True, trust_remote_code is never switched on, and
checkpoint loaders ignore pickle-based weight files (a malicious one sits beside real weights)."""
import ast
import pickle
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")])


def calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_source_never_unpickles_or_trusts_remote_code(path):
    tree = ast.parse(path.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    for call in calls(tree, "load"):
        if ast.unparse(call.func) == "torch.load":
            kw = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, ast.unparse(call)
    for call in ast.walk(tree):
        if isinstance(call, ast.Call):
            for k in call.keywords:
                if k.arg == "trust_remote_code":
                    assert isinstance(k.value, ast.Constant) and k.value.value is False, ast.unparse(call)


class Boom:
    def __reduce__(self):  # unpickling this creates MARKER: proof that code ran
        return (Path.touch, (Path(MARKER),))


MARKER = None


def test_pickled_weights_beside_a_checkpoint_are_never_loaded(tmp_path):
    global MARKER
    from qwen3 import Qwen3, Qwen3Config, from_pretrained, save_pretrained
    MARKER = str(tmp_path / "exploded")
    model = Qwen3(Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    save_pretrained(model, tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "pytorch_model.bin", "wb") as f:  # the legacy pickle format
        pickle.dump(Boom(), f)
    loaded = from_pretrained(tmp_path / "ckpt")
    assert not Path(MARKER).exists()
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "ckpt" / "model.safetensors").unlink()  # only the pickle is left: refused, not loaded
    with pytest.raises(ValueError, match="no model.safetensors"):
        from_pretrained(tmp_path / "ckpt")
    assert not Path(MARKER).exists()
    with open(tmp_path / "ckpt" / "pytorch_model.bin", "rb") as f:  # control: the file really is an exploit
        pickle.load(f)
    assert Path(MARKER).exists()
