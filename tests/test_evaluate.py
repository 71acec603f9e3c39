"""python -m guidesr.evaluate: its command line."""

import re

import pytest

from guidesr.evaluate import main


def test_help_names_the_module_and_states_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m guidesr.evaluate ")
    options = re.split(r"\n  (?=--)", text.split("\noptions:\n", 1)[1])[1:]
    assert [o.split()[0] for o in options] == ["--checkpoint", "--preset", "--base-model", "--data", "--crop-size",
                                               "--seed", "--draws", "--json"]
    for option in options:
        assert "default" in option, option
    assert any(o.startswith("--data") and "(default sample)" in o for o in options)
    assert any(o.startswith("--crop-size") and "(default 256)" in o for o in options)
    assert any(o.startswith("--seed") and "(default 0)" in o for o in options)
