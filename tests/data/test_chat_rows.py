"""Chat rows: the loss mask covers exactly the assistant's turns (found by rendering prefixes) under the fixture
tokenizers' own templates, the ids are the template's, and pairs keep their answers only."""

import pathlib

import numpy as np
import pytest

from lwjax.data import chat_rows, chat_template, hf_tokenizer

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "hf" / "tokenizers"
CONVERSATION = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "It is 2."},
                {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Glad to help."}]
# What each template writes after an assistant's content, which the model must learn to emit.
END_OF_TURN = {"llama3_style": "<|eot_id|>", "qwen_style": "<|im_end|>\n", "gemma_style": "<end_of_turn>\n"}


def _masked_text(tok, row):
  weights = row["loss_mask"] > 0
  pieces, current = [], []
  for target, keep in zip(row["targets"], weights, strict=True):
    if keep:
      current.append(int(target))
    elif current:
      pieces.append(tok.decode(current, skip_special_tokens=False))
      current = []
  return pieces + ([tok.decode(current, skip_special_tokens=False)] if current else [])


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_sft_row_masks_the_assistant_turns_only(name):
  tok = hf_tokenizer.load(str(FIXTURES / name))
  ids, weights = chat_rows.encode(tok, CONVERSATION)
  assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True)
  row = chat_rows.sft_row(tok, CONVERSATION, seq_len=128)
  eot = END_OF_TURN[name]
  assert _masked_text(tok, row) == ["It is 2." + eot, "Glad to help." + eot]
  n = len(ids) - 1
  np.testing.assert_array_equal(row["inputs"][:n], ids[:-1])
  np.testing.assert_array_equal(row["targets"][:n], ids[1:])
  assert row["segment_ids"].sum() == n and not row["loss_mask"][n:].any()
  _, last = chat_rows.encode(tok, CONVERSATION, last_answer_only=True)
  assert sum(last) < sum(weights) and last[-1] == weights[-1] and last.index(1.0) > weights.index(1.0)


def test_a_row_is_cut_to_seq_len_and_dropped_when_no_answer_is_left():
  tok = hf_tokenizer.load(str(FIXTURES / "llama3_style"))
  prompt_len = len(chat_rows.prompt_ids(tok, CONVERSATION[:1]))
  row = chat_rows.sft_row(tok, CONVERSATION, seq_len=prompt_len + 2)
  assert row["loss_mask"].sum() == 3 and row["segment_ids"].all()  # seq_len + 1 tokens: 3 of the first answer
  assert chat_rows.sft_row(tok, CONVERSATION, seq_len=prompt_len - 1) is None


def test_preference_row_holds_chosen_then_rejected_with_their_answers_masked():
  tok = hf_tokenizer.load(str(FIXTURES / "llama3_style"))
  prompt = CONVERSATION[:1]
  chosen, rejected = prompt + [{"role": "assistant", "content": "It is 2."}], prompt + [
      {"role": "assistant", "content": "No idea."}]
  row = chat_rows.preference_row(tok, chosen, rejected, seq_len=64)
  assert row["inputs"].shape == (2, 64) and row["loss_mask"].shape == (2, 64)
  assert _masked_text(tok, {k: v[0] for k, v in row.items()}) == ["It is 2.<|eot_id|>"]
  assert _masked_text(tok, {k: v[1] for k, v in row.items()}) == ["No idea.<|eot_id|>"]
  prompt_len = len(chat_rows.prompt_ids(tok, prompt))
  np.testing.assert_array_equal(row["inputs"][0, :prompt_len], row["inputs"][1, :prompt_len])
  assert chat_rows.preference_row(tok, chosen, rejected, seq_len=prompt_len - 1) is None


def test_a_template_that_rewrites_earlier_turns_is_refused():
  tok = hf_tokenizer.load(str(FIXTURES / "llama3_style"))
  # Every message is written after the latest one (newest first), so a shorter rendering is no prefix.
  tok.chat_templates = {"default": "{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}assistant: {% endif %}"}
  with pytest.raises(chat_template.ChatTemplateError, match="message 1 .* not a prefix"):
    chat_rows.sft_row(tok, CONVERSATION, seq_len=64)
