"""Secret references as operators write them: `file:` names a small regular file, and anything else is refused
at once with a reason, never read whole or waited on."""

import os
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from worker.secrets import MAX_SECRET_FILE_BYTES, SecretUnresolved, reference_status, resolve_secret


def test_a_secret_file_is_read_and_its_surrounding_whitespace_dropped(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-from-a-file-0123\n")

    assert resolve_secret(SecretStr(f"file:{key}")) == "sk-from-a-file-0123"


def test_a_fifo_named_as_a_secret_file_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    outcome: list[BaseException | str] = []

    def resolve() -> None:
        try:
            outcome.append(resolve_secret(SecretStr(f"file:{fifo}")))
        except BaseException as exc:
            outcome.append(exc)

    # In a thread, so a read that blocks (as it did) fails this test instead of hanging the run.
    reader = threading.Thread(target=resolve, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():
        with open(fifo, "w"):  # a writer that closes at once releases the blocked reader
            pass
        reader.join(timeout=10)
        pytest.fail("resolving a secret from a FIFO blocked until something wrote to it")

    [raised] = outcome
    assert isinstance(raised, SecretUnresolved)
    assert "not a regular file" in raised.message
    assert raised.reference == f"file {fifo}"
    assert reference_status(SecretStr(f"file:{fifo}")) == f"file:{fifo}: NOT A REGULAR FILE here"


def test_a_directory_named_as_a_secret_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretUnresolved, match="not a regular file"):
        resolve_secret(SecretStr(f"file:{tmp_path}"))


def test_a_secret_file_over_the_cap_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    huge = tmp_path / "key"
    huge.write_bytes(b"k" * (MAX_SECRET_FILE_BYTES + 1))

    with pytest.raises(SecretUnresolved, match=f"larger than {MAX_SECRET_FILE_BYTES} bytes") as raised:
        resolve_secret(SecretStr(f"file:{huge}"))

    assert "kkkk" not in raised.value.message


def test_a_secret_file_at_the_cap_is_read(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"k" * MAX_SECRET_FILE_BYTES)

    assert len(resolve_secret(SecretStr(f"file:{key}"))) == MAX_SECRET_FILE_BYTES


def test_a_missing_secret_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent"

    with pytest.raises(SecretUnresolved, match="No such file") as raised:
        resolve_secret(SecretStr(f"file:{missing}"))

    assert raised.value.reference == f"file {missing}"
