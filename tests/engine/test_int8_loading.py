"""int8 serving loads weights straight into int8: its peak memory stays well under an fp32 load's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
from chatcore.sampling import SamplingParams
from chatcore.weights import build_engine

# Run in a fresh process. A tiny model is loaded first the same way, so the code
# pages of the kernels involved are already resident; the peak resident set
# (VmHWM) is then reset (clear_refs 5) and counted from just before the load.
_MEASURE = """
import json, sys
from chatcore.weights import build_engine

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

build_engine({"checkpoint": sys.argv[3], "device": "cpu", "threads": 1, "quantize": sys.argv[2]})
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, anon = status("VmRSS"), status("RssAnon")
engine = build_engine({"checkpoint": sys.argv[1], "device": "cpu", "threads": 1, "quantize": sys.argv[2]})
peak, anon_after = status("VmHWM") - before, status("RssAnon") - anon
import ctypes
ctypes.CDLL(None).malloc_trim(0)  # what the C heap still held free after the load
print(json.dumps({"peak": peak, "anon_after": anon_after, "model_id": engine.model_id,
                  "trimmable": anon_after - (status("RssAnon") - anon)}))
"""


def _load_peak(path, quantize: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), quantize, str(path.parent / "warmup.safetensors")],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gpt2_shapes(tmp_path_factory):
    """GPT-2 124M's shapes (random weights): big enough that a second copy of the model shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        model = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768))
    path = checkpoint.save(model, tmp_path_factory.mktemp("gpt2") / "gpt2_random")
    del model
    warmup = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    checkpoint.save(warmup, path.parent / "warmup")
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_int8_load_peak_memory_well_under_fp32(gpt2_shapes):
    fp32 = _load_peak(gpt2_shapes, "none")
    int8 = _load_peak(gpt2_shapes, "int8")
    assert int8["model_id"].endswith(" int8") and not fp32["model_id"].endswith(" int8")
    # fp32 holds ~498 MB of weights (measured peak ~650 MB). int8 holds ~85 MB of int8 block matrices, the
    # packed head and the embedding's int8 rows (38.6 MB each) and no fp32 embedding: its peak measured
    # 0.33-0.39x fp32's (0.53x while the 154 MB fp32 embedding was kept and read whole)
    assert fp32["peak"] > 450e6, fp32
    assert int8["peak"] < 0.45 * fp32["peak"], (int8, fp32)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; glibc's malloc_trim")
def test_loading_leaves_no_freed_heap_resident(gpt2_shapes):
    # int8 loading frees each matrix's int8 values once fbgemm has packed them; without a trim they
    # stayed resident in glibc's heap (measured 36-55 MB of a 124M model), unused for good
    int8 = _load_peak(gpt2_shapes, "int8")
    assert int8["trimmable"] < 8e6, int8


def test_direct_int8_load_computes_what_quantizing_after_load_does(tmp_path):
    from chatcore import hf
    from chatcore.quant import quantize_int8

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    native = checkpoint.save(model, tmp_path / "tiny")
    hf_dir = tmp_path / "tiny_hf"  # a Hugging Face GPT-2 directory: Conv1D layouts, HF names
    hf_dir.mkdir()
    c = model.config
    (hf_dir / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", n_positions=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)))
    save_file({k: v.contiguous() for k, v in hf.to_hf_state_dict(model).items() if k != "lm_head.weight"},
              str(hf_dir / "model.safetensors"))
    reference = quantize_int8(build_engine({"checkpoint": str(native), "device": "cpu", "quantize": "none"}).model)
    idx = torch.tensor([[464, 2068, 7586, 21831, 18045, 625]])
    want, _ = reference(idx)
    for path in (native, hf_dir):
        engine = build_engine({"checkpoint": str(path), "device": "cpu", "quantize": "int8"})
        got, _ = engine.model(idx)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert engine.generate("Human: hi\nAssistant:", SamplingParams(max_new_tokens=3, temperature=0)) is not None


def test_int8_loads_a_hugging_face_file_holding_an_explicit_copy_of_the_tied_head(tmp_path):
    """The copy is compared with the embedding before int8 loading replaces the embedding."""
    from chatcore import hf

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    c = model.config
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", n_positions=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)))
    state = {k: v.clone().contiguous() for k, v in hf.to_hf_state_dict(model).items()}
    assert "lm_head.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    int8 = build_engine({"checkpoint": str(tmp_path), "device": "cpu", "quantize": "int8"})
    fp32 = build_engine({"checkpoint": str(tmp_path), "device": "cpu", "quantize": "none"})
    idx = torch.tensor([[464, 2068, 7586]])
    torch.testing.assert_close(int8.model(idx)[0], fp32.model(idx)[0], rtol=0, atol=0.05)
