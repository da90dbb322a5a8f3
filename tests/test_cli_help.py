"""``vlmkit --help`` lists every command without importing torch or transformers; each command's own help still
shows its arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlmkit import cli

PROBE = """
import sys
from vlmkit import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
print("HEAVY", sorted(m for m in ("torch", "transformers", "numpy", "PIL", "fastapi") if m in sys.modules))
"""


def test_top_level_help_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for name in cli.COMMANDS:
        assert name in out


ARGUMENTS = [("chat", "--image"), ("describe", "--token-budget"), ("serve", "--allowed-hosts"), ("train", "--set"),
             ("data", "synth")]  # fmt: skip


@pytest.mark.parametrize("name, argument", ARGUMENTS)
def test_each_command_help_has_its_arguments(name, argument, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert argument in capsys.readouterr().out
