"""The run card and other run artifacts, read and written by chatlora.runcard."""

from __future__ import annotations

import json
import math

import pytest

from chatlora.errors import ModelError
from chatlora.runcard import (
    RUN_CARD,
    added_system_prompt,
    read_run_card,
    system_prompt,
    system_prompt_note,
    write_run_card,
)


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


def test_system_prompts_of_new_and_older_run_cards():
    """Guards against older run cards (no ``template.system_prompts``) losing their prompt: they added
    ``system_prompt`` to every record without one. A new card keeps what was added apart from the one trained prompt
    (issue 22.6), and says why there is none."""
    old = {"template": {"system_prompt": "现在你要扮演皇帝身边的女人--甄嬛"}}
    assert system_prompt(old) == added_system_prompt(old) == "现在你要扮演皇帝身边的女人--甄嬛"
    assert system_prompt_note(old) == ""
    several = {"template": {"system_prompt": None, "system_prompts": {"added": None, "trained_distinct": 12}}}
    assert system_prompt(several) is None and added_system_prompt(several, default="D") is None
    assert system_prompt_note(several).startswith("the run trained 12 distinct system prompts, one per conversation")
    none = {"template": {"system_prompt": None, "system_prompts": {"added": None, "trained_distinct": 0}}}
    assert system_prompt_note(none) == "the run trained without a system prompt"
    shared = {"template": {"system_prompt": "S", "system_prompts": {"added": None, "trained_distinct": 1}}}
    assert system_prompt(shared) == "S" and added_system_prompt(shared) is None and system_prompt_note(shared) == ""
