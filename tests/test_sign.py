"""``llamalab sign`` and ``verify --signature``: interchangeable with model-signing's own tool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_hf_model

pytest.importorskip("model_signing", reason="model-signing is not installed (llamalab[sign])")

from llamalab.cli import main


def model_signing(*args: str) -> subprocess.CompletedProcess:
    """model-signing's own command line (its `key` method: an elliptic-curve key, offline)."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("keys")
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "key.pem", folder / "key.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "model"
    make_hf_model("grouped-query").save_pretrained(folder)
    return folder


def tamper(model: Path) -> None:
    config = model / "config.json"
    config.write_text(config.read_text() + " ")


def test_a_signature_made_here_verifies_with_model_signing(model, keys, tmp_path, capsys):
    private, public = keys
    assert main(["sign", str(model), "--private-key", str(private)]) == 0
    signature = model / "model.sig"  # inside the folder, left out of what is signed
    assert signature.is_file()
    proc = model_signing(
        "verify", "key", str(model), "--signature", str(signature), "--public_key", str(public)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        main(["verify", str(model), "--signature", str(signature), "--public-key", str(public)])
        == 0
    )
    # Never overwritten.
    capsys.readouterr()
    assert main(["sign", str(model), "--private-key", str(private)]) == 1
    assert "already exists" in capsys.readouterr().err
    tamper(model)
    proc = model_signing(
        "verify", "key", str(model), "--signature", str(signature), "--public_key", str(public)
    )
    assert proc.returncode != 0
    code = main(["verify", str(model), "--signature", str(signature), "--public-key", str(public)])
    assert code == 1
    err = capsys.readouterr().err
    assert "does not verify" in err and "config.json" in err


def test_a_signature_model_signing_made_verifies_here(model, keys, tmp_path, capsys):
    private, public = keys
    signature = tmp_path / "theirs.sig"
    proc = model_signing(
        "sign", "key", str(model), "--signature", str(signature), "--private_key", str(private)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = ["verify", str(model), "--signature", str(signature), "--public-key", str(public)]
    assert main(args) == 0
    assert "signature: OK" in capsys.readouterr().err
    # Another key's public half does not verify it.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "other.pub"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert main([*args[:-1], str(other)]) == 1
    tamper(model)
    assert main(args) == 1
    assert "does not verify" in capsys.readouterr().err


def test_without_model_signing_the_error_says_how_to_install(model, keys, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "model_signing", None)
    monkeypatch.setitem(sys.modules, "model_signing.hashing", None)
    assert main(["sign", str(model), "--private-key", str(keys[0])]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "llamalab: error: signatures need the model-signing package: "
        "pip install 'llamalab[sign]' (or pip install model-signing==1.1.1)"
    )
    assert not (model / "model.sig").exists()
