"""Tokenizer of the tiny models: a byte-level BPE with Qwen2's own pre-tokenizer, ChatML template.

transformers 5 loads ``Qwen2Tokenizer`` for every model of type qwen2 and rebuilds a byte-level BPE
from the vocab and merges in tokenizer.json with Qwen2's fixed normalizer (NFC), split regex
(digits one by one) and ByteLevel pre-tokenizer. Training the BPE with exactly that setup is what
makes ``AutoTokenizer.from_pretrained(model_dir)`` read it back token for token; the full byte
alphabet keeps every string encodable. ``<think>``/``</think>`` are ordinary BPE tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# Same pattern as transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen ChatML without Qwen's default system prompt: a system message is rendered only if given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The tool-use variant: ``tools=`` (OpenAI schemas, wrapped in {"type": "function", "function": ...} or bare) render
# as one short system line naming them, ``tools: add, multiply`` (a 0.5M model has no room for JSON schemas).
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\ntools: ' }}"
    "{%- for t in tools %}{{- (t.function.name if t.function is defined else t.name) }}"
    "{{- ', ' if not loop.last }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    + CHAT_TEMPLATE
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 320, chat_template: str = CHAT_TEMPLATE
                    ) -> PreTrainedTokenizerFast:
    """Byte-level BPE of at most ``vocab_size`` tokens trained on ``texts`` (see ``corpus_text``).

    Special tokens take ids 0..2 (pad ``<|endoftext|>``, ``<|im_start|>``, eos ``<|im_end|>``).
    """
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast


def corpus_text(problem: str, solution: str) -> str:
    """Training text for the BPE: the chat turns without the special tokens, which stay atomic."""
    return f"system\nuser\n{problem}\nassistant\n{solution}\n"


def render_prompt(tokenizer, problem: str) -> str:
    """The prompt the tiny models were trained on: one user turn, no system, generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True
    )
