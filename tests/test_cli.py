import shutil
import subprocess
import sys
from pathlib import Path

VERBS = ["prepare", "train", "generate", "eval", "export", "serve"]


def test_help_lists_every_verb_in_pipeline_order():
    cmd = [sys.executable, "-m", "smallm", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ") and line.split()]
    assert listed == VERBS


def test_console_script_and_python_m_print_the_same_help():
    script = shutil.which("smallm", path=str(Path(sys.executable).parent))
    assert script is not None, "the `smallm` console script is not installed next to this Python"
    via_script = subprocess.run([script, "train", "--help"], capture_output=True, text=True, check=True)
    via_module = subprocess.run(
        [sys.executable, "-m", "smallm", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert via_script.stdout == via_module.stdout
    assert "--max-iters" in via_script.stdout


def test_every_verb_has_help_with_defaults():
    for verb in VERBS:
        out = subprocess.run([sys.executable, "-m", "smallm", verb, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, verb
        assert "default" in out.stdout, f"`smallm {verb} --help` shows no defaults"


def test_unknown_verb_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "smallm", "fly"], capture_output=True, text=True)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
