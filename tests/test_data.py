"""Text loading, the Tiny Shakespeare download, vocabulary, split and batch streams."""
import http.server
import socket
import threading

import pytest
import torch

from fastformers import data
from fastformers.cli import main
from fastformers.data import Corpus, DataError, SequentialBatches, ShuffledBatches

from lm_helpers import sample_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(sample_text(5000), encoding="utf-8")
    return path


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_text(tmp_path / "nope.txt")


def test_empty_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        data.read_text(empty)


def test_directory_and_binary_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        data.read_text(tmp_path)
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not UTF-8"):
        data.read_text(binary)


def test_text_too_short_to_split():
    with pytest.raises(DataError, match="too short"):
        Corpus.from_text("abc")


@pytest.mark.parametrize("contents, message", [(None, "no such file"), ("", "empty")])
def test_cli_wrong_data_path_or_empty_file(tmp_path, capsys, contents, message):
    path = tmp_path / "data.txt"
    if contents is not None:
        path.write_text(contents)
    assert main(["train", "xl", "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "1"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_vocabulary_and_90_10_split():
    text = "hello world, hello fastformers"
    corpus = Corpus.from_text(text)
    assert corpus.vocab.chars == sorted(set(text))
    assert corpus.train.numel() == int(len(text) * 0.9)
    assert corpus.vocab.decode(torch.cat((corpus.train, corpus.valid))) == text
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        corpus.vocab.encode("xyz")


def test_sequential_batches_follow_the_text_and_wrap():
    ids = torch.arange(100)
    batches = SequentialBatches(ids, batch_size=4, seq_len=5)
    x0, y0 = next(batches)
    x1, _ = next(batches)
    assert x0.shape == (5, 4)
    assert torch.equal(y0[:-1], x0[1:])
    # Column b continues where it stopped: the text is read in order per column.
    assert torch.equal(x1[0], x0[-1] + 1)
    for _ in range(len(batches) - 2):
        next(batches)
    assert batches.epoch == 0
    again, _ = next(batches)
    assert batches.epoch == 1 and torch.equal(again, x0)


def test_shuffled_batches_are_seeded_and_resume_exactly():
    ids = torch.arange(1000)
    first = ShuffledBatches(ids, batch_size=8, seq_len=10, seed=3)
    for _ in range(20):  # crosses an epoch boundary (12 batches per epoch)
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(3)]
    resumed = ShuffledBatches(ids, batch_size=8, seq_len=10, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [next(resumed) for _ in range(3)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert torch.equal(y[:-1], x[1:])
    other_seed = ShuffledBatches(ids, batch_size=8, seq_len=10, seed=4)
    assert not torch.equal(next(other_seed)[0], next(ShuffledBatches(ids, batch_size=8, seq_len=10, seed=3))[0])


def test_batches_need_enough_text():
    with pytest.raises(DataError, match="too few"):
        SequentialBatches(torch.arange(20), batch_size=4, seq_len=5)
    with pytest.raises(DataError, match="too few"):
        ShuffledBatches(torch.arange(20), batch_size=4, seq_len=5)


class _TextHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_download_once_into_the_cache(tmp_path, monkeypatch):
    _TextHandler.body = sample_text(3000).encode()
    _TextHandler.requests = 0
    server = http.server.HTTPServer(("127.0.0.1", 0), _TextHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/input.txt"
        monkeypatch.setenv("FASTFORMERS_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", url)
        corpus = data.load_corpus()
        assert data.download_tiny_shakespeare() == tmp_path / "cache" / data.TINY_SHAKESPEARE_FILE
        assert _TextHandler.requests == 1
        assert corpus.vocab.decode(torch.cat((corpus.train, corpus.valid))) == _TextHandler.body.decode()
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.TINY_SHAKESPEARE_FILE]
    finally:
        server.shutdown()
        server.server_close()


def test_offline_download_says_what_to_do(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError) as error:
        data.download_tiny_shakespeare(f"http://127.0.0.1:{port}/input.txt", tmp_path / "cache", timeout=5)
    message = str(error.value)
    assert "could not download" in message and "curl" in message and "--data" in message
    assert not any((tmp_path / "cache").iterdir())


def test_cache_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFORMERS_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("FASTFORMERS_CACHE")
    assert data.cache_dir().parts[-2:] == (".cache", "fastformers")
