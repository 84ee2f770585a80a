"""The words sent to the MLLM. One place, so every backend asks the same questions."""

from collections.abc import Sequence

SYSTEM = "You are a careful visual inspector. Judge only what is visible in the image."

# The statement comes last: every word before it is shared by all questions about one image and is
# computed once with the image prefix; only the statement and the turn's closing tokens are per question.
YES_NO = "Answer Yes or No. Is the following true of what is visible in the image? {statement}"

REASON_STEP = (
    "Decide step by step whether the following is visible in the image: {statement}. "
    "Judge only what is visible, not context, intent or what might happen."
)

REASON_SUMMARY = (
    'Summarise your decision as JSON: {{"rating": "Yes" or "No", "rationale": "one sentence"}}.'
)


def yes_no_question(statement: str) -> str:
    """The same words with and without the image: the prior M(None, c) differs only by the image."""
    return YES_NO.format(statement=statement.rstrip(". "))


def reasoning_turns(statement: str) -> tuple[str, str]:
    return REASON_STEP.format(statement=statement.rstrip(". ")), REASON_SUMMARY


def chat_messages(turns: Sequence[str], image: bool, answers: Sequence[str] = ()) -> list[dict]:
    """The conversation in the Hugging Face chat-template format: the system turn, then the user turns
    (the image, if any, opening the first) with the model's earlier answers in between.

    Every question about one image renders to the same system + image + opening words, which is the
    prefix that KV-cache reuse and shared-prefix scoring depend on.
    """
    messages: list[dict] = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    for index, turn in enumerate(turns):
        content: list[dict] = [{"type": "text", "text": turn}]
        if image and index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if index < len(answers):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[index]}]})
    return messages
