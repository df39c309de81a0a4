"""End-to-end runs of the entry points at toy sizes: the demo, training, generation."""

import json
import subprocess
import sys

import pytest


def _run(*args, cwd):
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                        check=True, timeout=600)


@pytest.mark.slow
def test_train_then_generate_from_the_command_line(tmp_path):
  repo = __import__("pathlib").Path(__file__).resolve().parents[1]
  workdir = tmp_path / "run"
  overrides = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.d_ff=64",
               "--config.data.seq_len=32", "--config.data.batch_size=2", "--config.data.max_bytes=50000",
               "--config.train.num_steps=3", "--config.train.eval_every=3", "--config.train.eval_batches=1"]
  _run("experiments.train", "--config=configs/local_global_tiny.py", f"--workdir={workdir}",
       *overrides, cwd=repo)
  steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(steps) == 3
  out = _run("experiments.generate", f"--workdir={workdir}", "--prompt=import ", "--length=12",
             cwd=repo).stdout
  assert out.startswith("import ") and len(out.encode()) >= len("import ")


@pytest.mark.slow
def test_demo_writes_table_results_and_plot(tmp_path):
  repo = __import__("pathlib").Path(__file__).resolve().parents[1]
  out = _run("experiments.demo", "--steps=2", "--batch_size=2", "--sample_length=8",
             f"--out={tmp_path}", cwd=repo).stdout
  assert "| full | G |" in out and "| local_global | GLL |" in out
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [r["model"] for r in rows] == ["full", "local_global"]
  assert all(r["steps"] == 2 and r["sample"].startswith("def ") for r in rows)
  assert rows[1]["cache_bytes_per_token@131072"] < rows[0]["cache_bytes_per_token@131072"]
  assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
