"""nla_fast.messages.short_error: one way to tell an exception in a note or an error line."""
from nla_fast.messages import short_error


def test_a_multi_line_error_becomes_one_line_with_its_type():
    err = RuntimeError("backend='inductor' raised:\n  CompilationError: bad\n\n  at line 3")
    assert short_error(err) == "RuntimeError: backend='inductor' raised: CompilationError: bad at line 3"
    assert short_error(ValueError()) == "ValueError"
    assert short_error(err, first_line=True) == "RuntimeError: backend='inductor' raised:"


def test_a_long_error_is_cut_to_the_limit():
    text = short_error(OSError("x" * 1000), limit=50)
    assert len(text) == 50 and text.startswith("OSError: xxx") and text.endswith("...")


def test_a_build_log_keeps_its_lines_and_its_tail():
    log = "\n".join(f"line {i}" for i in range(400)) + "\nerror: the real cause"
    text = short_error(RuntimeError(log), limit=200, tail=60, keep_lines=True)
    assert len(text) <= 200 and text.startswith("RuntimeError: line 0\nline 1\n")
    assert text.endswith("error: the real cause") and "\n...\n" in text
