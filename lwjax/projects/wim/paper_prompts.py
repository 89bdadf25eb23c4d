"""The paper's natural-language prompts (Writing in the Margins, arXiv 2408.14906, §2-3, as its code publishes them:
`templates/` and `examples/` of writer/writing-in-the-margins) rendered through a pretrained reader's chat template.

The context sits inside one user turn, between `<excerpt>` tags, after the system message:

  [system] You are a helpful assistant. ... [user] You are given the following excerpt:\n<excerpt>\n<segments...>
  margin:     </excerpt>\n\nGiven the above context, extract all information relevant to the query: "{query}". ...
              [end of turn, assistant header] -> the margin
  answer:     </excerpt>\n\nAdditionally, use the information below ... <margins>\n{margins}\n</margins>\n
              Question:\n{query}   [end of turn, assistant header] -> the answer
  direct:     </excerpt>\n\nQuestion:\n{query}   (full context, retrieval-only, and WiM when no margin is kept)
  relevance:  its own conversation, [user] I asked an LLM assistant whether a piece of document is related to the
              query ... Provide the answer in the format: <YES/NO>#<Explanation>. -> relevant when the text before
              the first `#` ends with YES (the paper's parse)

The chat template renders the whole turn once with a placeholder where the context goes; the text before it is
the head (prefilled with the first segment), the text after it the prompt that follows the last prefilled segment.
A template that refuses a system turn (Gemma's) gets the system message at the start of the user turn; a tokenizer
without a template gets the texts joined by blank lines after its bos. Kept margins are joined by blank lines (the
paper's code concatenates them as they are).
"""

from __future__ import annotations

from collections.abc import Sequence

from lwjax.data.chat_template import ChatTemplateError
from lwjax.data.tokenizer import bos_prefix
from lwjax.serving import wim

SYSTEM = ("You are a helpful assistant. Your goal is to give answers to questions given an excerpt from a book. \n"
          "Give the answer using only the words in the excerpt. The excerpt is delimited by the following tags: "
          "<excerpt> </excerpt>.\nIf you're unable to find the answer, say \"I don't know\".")
OPENING = "You are given the following excerpt:\n<excerpt>\n"
EXTRACTION = ("</excerpt>\n\nGiven the above context, extract all information relevant to the query: \"{query}\". If "
              "the context is not relevant to the query, answer \"I don't know.\"")
MARGINS = ("</excerpt>\n\nAdditionally, use the information below to answer the query given below. It is delimited "
           "by the following tags: <margins></margins>.\n<margins>\n{margins}\n</margins>\n")
DIRECT = "</excerpt>\n\n"
QUESTION = "Question:\n{query}\n"
CLASSIFICATION = ('I asked an LLM assistant whether a piece of document is related to the query: "{query}". This is '
                  "its answer: \n" + """```text
{answer}
```
Should I save it for later? 
Here are rules:
- Answer YES if the answer contains information about the query. 
- Answer NO if the answer says the piece isn't related to the query.

Provide the answer in the format: <YES/NO>#<Explanation>. 
Here is are example answers:

YES#Yes, the information contains an excerpt from a book that is related to the question.
NO#No, the LLM assistant concluded the information isn't relevant.

Don't add any other comments, all your remarks should be included in the "Explanation" section.
""")  # noqa: W291 - the paper's text, trailing spaces included
_CONTEXT = "\x00CONTEXT\x00"
DATE = "26 Jul 2024"  # templates that print today's date (Llama 3.1) print this one: the same prompt every day


def parse_relevance(text: str) -> bool:
  """The paper's parse of a relevance answer: YES before the first `#`."""
  return text.replace("```", "").strip().split("#")[0].endswith("YES")


class ChatPrompts:
  """The paper's prompts as token ids of `tokenizer` (a Hugging Face tokenizer, with or without a chat template)."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.head, _ = self._around_context(DIRECT)

  def _render(self, system: str | None, user: str) -> str:
    template = getattr(self.tok, "chat_template", None)
    if template is None:
      return "\n\n".join(t for t in (system, user) if t) + "\n\n"
    messages = [{"role": "user", "content": user}]
    try:
      if system is not None:
        return self.tok.apply_chat_template([{"role": "system", "content": system}, *messages],
                                            add_generation_prompt=True, date_string=DATE)
    except ChatTemplateError:  # no system turn in this template
      messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return self.tok.apply_chat_template(messages, add_generation_prompt=True, date_string=DATE)

  def _around_context(self, after: str) -> tuple[list[int], list[int]]:
    """(ids before the context, ids after it) of the user turn `OPENING <context> after`."""
    text = self._render(SYSTEM, OPENING + _CONTEXT + after)
    head, tail = text.split(_CONTEXT)
    prefix = bos_prefix(self.tok) if getattr(self.tok, "chat_template", None) is None else []
    return prefix + self.tok.encode(head), self.tok.encode(tail)

  def extraction(self, query: str) -> list[int]:
    return self._around_context(EXTRACTION.format(query=query))[1]

  def direct(self, query: str) -> list[int]:
    return self._around_context(DIRECT + QUESTION.format(query=query))[1]

  def answer(self, query: str, margins: Sequence[str]) -> list[int]:
    if not margins:
      return self.direct(query)
    return self._around_context(MARGINS.format(margins="\n\n".join(margins)) + QUESTION.format(query=query))[1]

  def classification(self, query: str, margin: str) -> list[int]:
    text = self._render(None, CLASSIFICATION.format(query=query, answer=margin))
    prefix = bos_prefix(self.tok) if getattr(self.tok, "chat_template", None) is None else []
    return prefix + self.tok.encode(text)

  def wim_prompts(self) -> wim.WiMPrompts:
    decode = self.tok.decode
    return wim.WiMPrompts(
        extraction=self.extraction,
        classification=lambda query, margin: self.classification(query, decode(margin).strip()),
        answer=lambda query, margins: self.answer(query, [decode(m).strip() for m in margins]),
        is_relevant=lambda output: parse_relevance(decode(output)))
