"""The README's code runs as written: its quickstart (register a Hugging Face directory, invoke it
through ``@trims_ray.function`` and ``trims_ray.open``) and its Ray Serve example, on a real local
Ray, offline.

The code blocks are the ones the README marks with ``<!-- readme-test: NAME -->``; they run in
one namespace, in this process (the driver), as a user would paste them. The model directory the
README downloads (SmolLM2-135M: LlamaForCausalLM, bf16, tied embeddings, SmolLM2's vocabulary) is
built here instead with ``save_pretrained``: the same class, dtype, vocabulary and tying, with two
small layers and random weights. Every answer is checked against that model run here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import trims_ray

# About 45 s on two cores: this module's Ray (10 s), the quickstart (10 s), Serve's start and the
# Serve example (15 s).
pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
MODEL_DIR = "smollm2"  # where the README's `hf download` puts it, relative to the working directory


def readme_blocks() -> dict[str, str]:
    """The README's marked Python blocks, by name."""
    found = re.findall(r"<!-- readme-test: ([\w-]+) -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    return dict(found)


def test_the_readme_marks_its_runnable_blocks():
    blocks = readme_blocks()
    assert set(blocks) == {"quickstart", "serve"}, f"marked blocks: {sorted(blocks)}"
    assert f'register("smollm2", "{MODEL_DIR}")' in blocks["quickstart"]
    assert f"--local-dir {MODEL_DIR}" in README.read_text()


def write_smollm2_like(directory: Path) -> None:
    """A Hugging Face directory as ``hf download HuggingFaceTB/SmolLM2-135M`` leaves it, but
    small: LlamaForCausalLM in bf16 with tied embeddings and SmolLM2's 49,152-token vocabulary."""
    from trims_ray._torchvision_ops import ensure_torchvision_importable

    ensure_torchvision_importable()  # this environment's torchvision is built for CUDA torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)


def expected_next_token(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    assert model.dtype == torch.bfloat16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the README's num_cpus=1 tasks: the same order of float sums
    try:
        with torch.inference_mode():
            return model(input_ids=input_ids).logits[:, -1].argmax(-1)
    finally:
        torch.set_num_threads(threads)


def test_the_quickstart_and_the_serve_example_run_as_written(ray_node, tmp_path, monkeypatch, capsys):
    from ray import serve

    monkeypatch.chdir(tmp_path)
    # The README's init() takes the default store ($TRIMS_RAY_STORE, set per test by the root
    # conftest) and the default disk tier, which must not be the user's.
    monkeypatch.setenv("TRIMS_RAY_DISK_DIR", str(tmp_path / "disk"))
    write_smollm2_like(tmp_path / MODEL_DIR)
    blocks = readme_blocks()
    namespace: dict = {"__name__": "readme"}
    try:
        exec(compile(blocks["quickstart"], f"{README}:quickstart", "exec"), namespace)
        quickstart_out = capsys.readouterr().out
        info = namespace["info"]
        assert info.name == "smollm2" and info.factory == "transformers:LlamaForCausalLM"
        expected = expected_next_token(tmp_path / MODEL_DIR, namespace["input_ids"])
        assert torch.equal(namespace["first"], expected)
        assert torch.equal(namespace["again"], expected)
        assert f"smollm2 {info.nbytes} {info.sha256[:12]}" in quickstart_out
        assert str(expected) in quickstart_out  # what in_any_task printed, among the others
        host = {node: s["tiers"]["host"] for node, s in trims_ray.stats().to_dict()["nodes"].items()}
        assert host[ray_node]["models"] == 1 and host[ray_node]["hits"] >= 1, host

        # The Serve example as written; its application is reached through the handle it gets,
        # so Serve runs without its HTTP proxy here (no port taken on a shared machine).
        serve.start(proxy_location="Disabled")
        exec(compile(blocks["serve"], f"{README}:serve", "exec"), namespace)
        serve_out = capsys.readouterr().out
        assert str(expected) in serve_out
        # The example ends with trims_ray.shutdown(): the library's actors are gone.
        from trims_ray.actors._naming import our_actor_names

        assert not our_actor_names()
    finally:
        serve.shutdown()
        trims_ray.shutdown()
