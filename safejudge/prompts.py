"""The words sent to the MLLM. One place, so every backend asks the same questions."""

SYSTEM = "You are a careful visual inspector. Judge only what is visible in the image."

YES_NO = "Is the following true of what is visible in the image: {statement}? Answer Yes or No."

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
