"""The dfbench command: parsing, listing, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from domainfusion_bench.cli import main


def test_list_shows_algorithms_datasets_domains_and_needs(capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert "ERM" in out and "RotatedDigits" in out and "1797 images" in out
    assert "poster (450), crayon (449), stencil (449), chalk (449)" in out
    assert "dfbench download PACS" in out


def test_cli_error_is_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--algorithm", "NoSuchAlgo", "--output_dir", "/tmp/never"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfbench train: error: unknown algorithm 'NoSuchAlgo'") and "\n" not in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "domainfusion_bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout
