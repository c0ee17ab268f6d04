"""`zb inspect` and `python -m zb`."""

import pathlib
import subprocess
import sys

from zb.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_inspect_prints_the_summary_and_writes_graph_files(tmp_path, capsys):
    assert main(["inspect", "tests.models:conv_norm", "--microbatches", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "options {'microbatches': 2}" in out
    assert "stage 0 backward_input" in out and "split_backward.fused_nodes_split=1" in out
    for piece in ("graph", "forward", "backward_input", "backward_weight", "joint", "backward"):
        text = (tmp_path / f"stage0_{piece}.py").read_text()
        assert text.startswith(f"# zb stage 0 {piece}\n") and "def forward" in text


def test_inspect_takes_a_path_to_a_python_file(tmp_path, capsys):
    target = f"{ROOT / 'examples' / 'gpt.py'}:tiny_factory"
    assert main(["inspect", target, "--out", str(tmp_path)]) == 0
    assert "user inputs (idx, targets)" in capsys.readouterr().out


def test_inspect_reports_bad_options_and_targets(tmp_path, capsys):
    assert main(["inspect", "tests.models:mlp", "--microbatches", "0", "--out", str(tmp_path)]) == 2
    assert "'microbatches' must be a positive int, got 0" in capsys.readouterr().err
    assert main(["inspect", "tests.models:nothing_here", "--out", str(tmp_path)]) == 2
    assert "has no callable 'nothing_here'" in capsys.readouterr().err
    assert main(["inspect", "tests.models", "--out", str(tmp_path)]) == 2
    assert "expected MODULE:FACTORY" in capsys.readouterr().err


def test_python_dash_m_zb_runs_the_same_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zb", "inspect", "tests.models:mlp", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "stage 0 forward" in out.stdout
