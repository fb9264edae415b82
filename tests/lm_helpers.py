"""Tiny configurations and text shared by the language-model tests."""
from pathlib import Path

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TINY_MODEL = dict(d_model=16, heads=2, d_ff=32, n_layers=2, mem_len=8, c_mem_len=8, compression_rate=2,
                  n_experts=3)


def sample_text(n_chars: int = 40_000) -> str:
    """The start of Tiny Shakespeare when the shared copy is present, else a generated stand-in."""
    if SHARED_TEXT.is_file():
        return SHARED_TEXT.read_text(encoding="utf-8")[:n_chars]
    lines = [f"{name}: {verb} the {thing}, {name.lower()}!\n"
             for name in ("ROMEO", "JULIET", "HAMLET", "LEAR")
             for verb in ("give me", "take", "see", "hear")
             for thing in ("crown", "sword", "night", "king", "rose")]
    return ("".join(lines) * (n_chars // len("".join(lines)) + 1))[:n_chars]
