"""`zb inspect` and `python -m zb`."""

import json
import pathlib
import subprocess
import sys

import pytest

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


def test_inspect_emits_the_triton_code_of_every_piece_without_a_gpu(tmp_path, capsys):
    assert main(["inspect", "tests.models:gpt", "--stages", "2", "--split-points", "blocks.1", "--compiler", "eager",
                 "--out", str(tmp_path), "--emit", "triton"]) == 0
    out = capsys.readouterr().out
    assert "Triton files" in out
    for stage, piece in [(0, "forward"), (0, "backward_weight"), (1, "forward"), (1, "backward_input"),
                         (1, "backward_weight")]:
        code = (tmp_path / f"stage{stage}_{piece}.triton.py").read_text()
        assert "@triton.jit" in code and "import triton.language as tl" in code, (stage, piece)
        compile(code, f"stage{stage}_{piece}.triton.py", "exec")  # valid Python
    # The fused attention is a call of zb's operator in the pieces, and zb's own kernels are written next to them.
    assert "torch.ops.zb.flash_attention.default" in (tmp_path / "stage1_forward.triton.py").read_text()
    assert "flash_attention_backward" in (tmp_path / "stage1_backward_input.triton.py").read_text()
    kernels = (tmp_path / "zb_flash_attention.triton.py").read_text()
    assert all(f"def {k}(" in kernels for k in ("_forward_kernel", "_backward_kv_kernel", "_backward_q_kernel"))


def test_check_passes_on_gpt_with_attention_and_optimizer_rows(capsys):
    assert main(["check", "tests.models:gpt_manual_attention", "--stages", "2", "--split-points", "blocks.1",
                 "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0] for line in out.splitlines()}
    for piece in ("stage 0 F", "stage 1 F", "stage 1 B", "stage 1 W", "stage 0 W",
                  "attention y (masked, fwd+3 grads)", "attention y_1 (masked, fwd+3 grads)",
                  "optimizer AdamW (fused update, 2 steps)"):
        assert piece in rows, (piece, out)
    assert "whole step (loss, " in out
    assert "FAIL" not in out and "9 of 9 pieces within tolerance" in out


def test_check_fails_on_a_wrong_pass_through_the_whole_step_row(monkeypatch, capsys):
    """A pass that gets the semantics wrong while every piece matches its own graph (here normalize_loss adding
    the microbatches' losses of a mean loss) fails the whole-step row against eager."""
    import zb.passes
    from zb.passes.normalize_loss import normalize_loss

    def wrong(plan):
        plan = normalize_loss(plan)
        plan.loss.mode = "sum"
        return plan

    wrong.__name__ = "normalize_loss"
    passes = [wrong if fn is normalize_loss else fn for fn in zb.passes.PASSES]
    monkeypatch.setattr(zb.passes, "PASSES", passes)
    monkeypatch.setattr("zb.backend.PASSES", passes)
    assert main(["check", "tests.models:mlp", "--microbatches", "2", "--compiler", "eager"]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("whole step") and line.rstrip().endswith("FAIL")]
    assert all(line.rstrip().endswith("pass") for line in out.splitlines() if line.startswith("stage")), out


def miscompile(monkeypatch, stage: int, name: str, factor: float) -> None:
    """Make zb compile piece `name` of `stage` wrong: its float outputs, and the gradient sums it adds into
    (codegen/accumulate.py), scaled by `factor`."""
    from zb.codegen import inductor
    from zb.passes.keys import Role

    real = inductor.compile_piece

    def compile_piece(gm, piece_name, piece_stage, compiler):
        piece = real(gm, piece_name, piece_stage, compiler)
        if (piece_stage, piece_name) == (stage, name):
            run = piece.run

            def wrong(args):
                out = [o * factor if hasattr(o, "dtype") and o.is_floating_point() else o for o in run(args)]
                for key, value in zip(piece.inputs, args):
                    if key.role is Role.GRAD:
                        value.mul_(factor)
                return out

            piece.run = wrong
        return piece

    monkeypatch.setattr(inductor, "compile_piece", compile_piece)


def test_check_fails_and_names_a_miscompiled_piece(monkeypatch, capsys):
    """A piece whose compiled code is wrong (here: stage 1's B, its output scaled by 1.001) must fail the check."""
    miscompile(monkeypatch, 1, "backward_input", 1.001)
    assert main(["check", "tests.models:gpt", "--stages", "2", "--split-points", "blocks.1",
                 "--compiler", "eager"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    # The piece is named; the whole step that runs it is wrong too.
    assert len(failed) == 2 and failed[0].startswith("stage 1 B") and failed[1].startswith("whole step"), out
    assert "2 FAILED" in out


def test_check_reports_a_wrong_attention_kernel(monkeypatch, capsys):
    """The attention row compares zb's operator with the softmax math: a kernel that drops the scale fails."""
    from zb.ops import attention

    real = attention.attention
    monkeypatch.setattr(attention, "attention", lambda q, k, v, bias=None, causal=False, scale=None:
                        real(q, k, v, bias, causal, 1.0))
    assert main(["check", "tests.models:sdpa_block", "--compiler", "eager"]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("attention") and line.rstrip().endswith("FAIL") for line in out.splitlines()), out


def test_object_options_have_no_flag(capsys):
    """'group' and 'optimizer' take objects: neither inspect nor check offers them (check's own --optimizer is a
    choice of optimizer class)."""
    for command in ("inspect", "check"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--group" not in out and "--microbatches" in out, command
        optimizer_lines = [line for line in out.splitlines() if "--optimizer" in line]
        if command == "inspect":
            assert not optimizer_lines, out
        else:
            assert optimizer_lines and all("{sgd,adam,adamw}" in line for line in optimizer_lines), out


@pytest.mark.parametrize("flag, kind", [("--stages", "an int"), ("--microbatches", "an int"),
                                        ("--timeout", "a number"), ("--max-grad-norm", "a number")])
@pytest.mark.parametrize("command", ["inspect", "check"])
def test_a_malformed_number_is_a_clean_error_before_the_model_is_built(monkeypatch, capsys, command, flag, kind):
    monkeypatch.setattr("zb.cli.load_factory", lambda target: pytest.fail("the model was loaded"))
    assert main([command, "tests.models:mlp", flag, "x"]) == 2
    captured = capsys.readouterr()
    name = flag[2:].replace("-", "_")
    assert captured.err == f"zb: error: option {name!r} takes {kind}, got 'x'\n"
    assert "Traceback" not in captured.err + captured.out


def test_boolean_flags_take_the_usual_spellings_and_reject_the_rest(monkeypatch, capsys):
    import zb.cli

    class Parsed(Exception):
        pass

    parsed = []
    real = zb.cli._options_from
    monkeypatch.setattr(zb.cli, "_options_from", lambda args: parsed.append(real(args)) or parsed[-1])
    monkeypatch.setattr(zb.cli, "load_factory", lambda target: (_ for _ in ()).throw(Parsed()))  # stop there
    for text, value in [("true", True), ("True", True), ("1", True), ("YES", True), ("on", True), ("On", True),
                        ("false", False), ("FALSE", False), ("0", False), ("No", False), ("off", False)]:
        with pytest.raises(Parsed):
            main(["inspect", "tests.models:mlp", "--profile", text])
        assert parsed[-1] == {"profile": value}, text
    with pytest.raises(Parsed):
        main(["check", "tests.models:mlp", "--post-validation", "off", "--fuse-attention", "no"])
    assert parsed[-1] == {"post_validation": False, "fuse_attention": False}
    for flag in ("--profile", "--rebalance", "--fuse-attention", "--post-validation"):
        assert main(["inspect", "tests.models:mlp", flag, "maybe"]) == 2
        err = capsys.readouterr().err
        name = flag[2:].replace("-", "_")
        assert err.startswith(f"zb: error: option {name!r} takes a boolean: true/false, 1/0, yes/no or on/off"), err
        assert "got 'maybe'" in err


def test_a_wrong_option_value_fails_before_the_model_is_built(monkeypatch, capsys):
    monkeypatch.setattr("zb.cli.load_factory", lambda target: pytest.fail("the model was loaded"))
    assert main(["check", "tests.models:mlp", "--compiler", "gcc"]) == 2
    assert "option 'compiler' must be one of 'inductor', 'eager'; got 'gcc'" in capsys.readouterr().err


def _imports_of(argv: list[str], packages: tuple[str, ...]) -> tuple[int, list[str]]:
    """Run `zb ARGV` in a fresh interpreter: (its exit code, the modules of `packages` it imported, up to 5)."""
    probe = ("import json, sys\n"
             "from zb.cli import main\n"
             "try:\n"
             "    code = main(sys.argv[2:])\n"
             "except SystemExit as e:\n"
             "    code = e.code\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[1].split(','))\n"
             "print(json.dumps([code, loaded[:5]]))\n")
    out = subprocess.run([sys.executable, "-c", probe, ",".join(packages), *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    code, loaded = json.loads(out.stdout.splitlines()[-1])
    return code, loaded


def test_help_and_schedule_import_neither_torch_nor_triton():
    """`zb --help` and `zb schedule` need no torch: they start fast and run where torch is not installed."""
    for argv in (["--help"], ["schedule", "--schedule", "zb-h1", "--stages", "4", "--microbatches", "8"]):
        code, heavy = _imports_of(argv, ("torch", "triton"))
        assert (code, heavy) == (0, []), argv


def test_schedule_with_data_parallel_reductions(capsys):
    """zb-v on 2 ranks, F = B = W = 1 ms: 2 replicas reduce 1e6 bytes per stage at 1 GB/s with 250 us per ring
    step, 2(D-1)/D x 1 ms + 2(D-1) x 0.25 ms = 1.5 ms per stage. Stage 3's last W (rank 0) ends at 9, and its
    reduction hides behind stage 0's compute, which ends at 14: only stage 0's reduction is exposed (1.5 ms).
    Reducing after each rank's compute exposes both of rank 0's (3 ms)."""
    import json

    base = ["schedule", "--schedule", "zb-v", "--stages", "4", "--microbatches", "2", "--costs", "F=1,B=1,W=1"]
    model = ["--data-parallel", "2", "--param-bytes", "1e6", "--bandwidth", "1", "--latency", "250"]
    assert main(base + model + ["--width", "28", "--lowered"]) == 0
    out = capsys.readouterr().out
    assert ("gradient reduction per stage [1.5, 1.5, 1.5, 1.5] (overlap): step time 15.5, exposed reduction 1.5; "
            "reducing after each rank's last compute instead: step time 17, exposed 3") in out
    assert "      R |" in out  # the reduction lane under each rank
    lowered = [line for line in out.splitlines() if line.startswith("rank 0: ")]
    assert lowered[0].endswith("0W1 0R") and "3W1 3R 0RECV_B0" in lowered[0]
    assert main(base + model + ["--reduction", "after", "--json", "--lowered"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["makespan"], result["step_time"], result["exposed_reduction"]) == (14, 17, 3)
    assert result["lowered"][1][-6:] == ["2W1", "2R", "1B1", "1SEND_B1", "1W1", "1R"]
    # the same time given directly, in the unit of --costs
    assert main(base[:-1] + ["F=1,B=1,W=1,R=1.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_time"] == 15.5


@pytest.mark.parametrize("flags, message", [
    (["--data-parallel", "2"], "--data-parallel needs --param-bytes"),
    (["--data-parallel", "0"], "--data-parallel must be at least 1, got 0"),
    (["--data-parallel", "2", "--param-bytes", "1e6", "--costs", "R=1"], "either as R= in --costs or by"),
    (["--data-parallel", "2", "--param-bytes", "1e6:2e6"], "param_bytes lists 2 values for 4 stages"),
    (["--data-parallel", "2", "--param-bytes", "lots"], "--param-bytes 'lots': give a number"),
])
def test_schedule_data_parallel_errors(capsys, flags, message):
    assert main(["schedule", "--schedule", "zb-h1", "--stages", "4", "--microbatches", "4", *flags]) == 2
    assert message in capsys.readouterr().err


def test_every_plan_says_how_far_it_is_from_the_lower_bound(capsys):
    """zb-h1, p = 2, m = 4, F = B = W = 1: span 13 against the bound 12 (the work of a rank)."""
    import json

    assert main(["schedule", "--schedule", "zb-h1", "--stages", "2", "--microbatches", "4"]) == 0
    assert "longest rank span 13 (the step time), within 8.33% of the lower bound 12" in capsys.readouterr().out
    assert main(["schedule", "--schedule", "zb-h1", "--stages", "2", "--microbatches", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["longest_span"], result["lower_bound"]) == (13, 12)


def test_schedule_exact_prints_the_optimum_and_its_status(capsys):
    """At 1p, 13 is optimal (zb-h1 reaches it); with 2p of memory the solver finds 12, the bound."""
    import json

    pytest.importorskip("ortools")
    base = ["schedule", "--schedule", "zb-h1", "--stages", "2", "--microbatches", "4", "--exact", "--time-limit", "20"]
    assert main(base + ["--memory-limit", "1p"]) == 0
    assert "exact: optimal, longest rank span 13; zb-h1's is 13" in capsys.readouterr().out
    assert main(base + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exact"] == {"status": "optimal", "longest_span": 12, "bound": 12, "time_limit": 20}
    assert result["longest_span"] == 12 and max(result["peak_memory"]) <= 4


def test_schedule_exact_reports_the_best_found_and_the_bound_when_time_runs_out(monkeypatch, capsys):
    pytest.importorskip("ortools")
    from zb.schedules import exact, generate

    found = exact.Solution(generate("zb-h1", 2, 4), "feasible", 13.0, 12.5, 1.0, False, 1.0)
    monkeypatch.setattr(exact, "solve", lambda *args, **kwargs: found)
    assert main(["schedule", "--schedule", "zb-h1", "--stages", "2", "--microbatches", "4", "--exact",
                 "--time-limit", "1"]) == 0
    assert ("exact: best found in 1 s, longest rank span 13; the solver's bound 12.5 (within 4.00%)"
            in capsys.readouterr().out)


def test_schedule_exact_without_ortools_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)
    assert main(["schedule", "--schedule", "zb-h1", "--stages", "2", "--microbatches", "4", "--exact"]) == 2
    assert "pip install 'zb[exact]'" in capsys.readouterr().err


def test_help_and_schedule_import_no_solver():
    """OR-Tools loads only for --exact: `zb --help` and a plain `zb schedule` stay instant."""
    for argv in (["--help"], ["schedule", "--schedule", "zb-auto", "--stages", "4", "--microbatches", "8"]):
        _, solver = _imports_of(argv, ("ortools",))
        assert solver == [], argv


def test_schedule_with_ranks_lets_zb_auto_choose_the_placement(capsys):
    assert main(["schedule", "--schedule", "zb-auto", "--ranks", "4", "--microbatches", "4", "--memory-limit", "1p",
                 "--costs", "F=18.522,B=18.086,W=9.337,comm=0.601"]) == 0
    out = capsys.readouterr().out
    assert "placement: v, 2 stage(s) per rank (v is fastest within 1p" in out
    assert "one-per-rank" in out and "interleaved" in out
    assert main(["schedule", "--schedule", "zb-h1", "--ranks", "4"]) == 2
    assert "--ranks lets zb-auto choose the placement" in capsys.readouterr().err
