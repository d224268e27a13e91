"""generate.py against hostile input (issue 23): malformed flags (class 6), one line each."""
import pytest

from test_generate import assert_one_line_error, run_main


def exit_code(capsys, *argv):
    """generate.main in this process: (its exit code, stdout, stderr)."""
    try:
        out, err = run_main(capsys, *argv)
        return 0, out, err
    except SystemExit as e:
        captured = capsys.readouterr()
        return e.code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["-n", "x"], "argument -n/--max-new-tokens: invalid int value: 'x'"),
    (["--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_a_bad_flag_is_one_line(capsys, argv, message):
    """As train.py's: one line and exit 2, not argparse's usage block."""
    code, out, err = exit_code(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, message, "(see --help)")

