"""The run card and other run artifacts, read and written by chatlora.runcard."""

from __future__ import annotations

import json
import math

import pytest

from chatlora.errors import ModelError
from chatlora.runcard import RUN_CARD, read_run_card, system_prompt, write_run_card


def test_card_round_trip_is_strict_json(tmp_path):
    """Guards against a non-finite number (an fp16 overflow's grad norm) written as NaN, which strict readers refuse."""
    card = {"template": {"system_prompt": "S"}, "results": {"eval_loss": math.nan, "losses": [1.0, math.inf]}}
    write_run_card(tmp_path, card)
    text = (tmp_path / RUN_CARD).read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert read_run_card(tmp_path)["results"] == {"eval_loss": None, "losses": [1.0, None]}
    assert read_run_card(tmp_path / "elsewhere") == {}  # an adapter trained elsewhere has no card


def test_system_prompt_none_is_kept_and_a_missing_one_falls_back():
    """Guards against a run trained with no system prompt getting one at inference (None is an answer), and against
    a card that does not say ignoring the caller's fallback."""
    assert system_prompt({"template": {"system_prompt": "S"}}, default="D") == "S"
    assert system_prompt({"template": {"system_prompt": None}}, default="D") is None
    assert system_prompt({"template": {}}, default="D") == "D"
    assert system_prompt({}) is None


def test_broken_card_is_a_model_error_naming_it(tmp_path):
    """Guards against a damaged card surfacing as a KeyError/TypeError traceback in chat, serve or eval."""
    (tmp_path / RUN_CARD).write_text(json.dumps({"template": "ChatML"}), encoding="utf-8")
    with pytest.raises(ModelError, match=f'{RUN_CARD}: "template" is'):
        read_run_card(tmp_path)
