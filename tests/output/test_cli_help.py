"""Every output CLI answers --help with its usage and exit status 0."""

import pytest

from tandem.output import eval_report, plots, report, smoke


@pytest.mark.parametrize("cli", [plots, report, smoke, eval_report],
                         ids=lambda m: m.__name__)
def test_help_exits_zero_with_usage(cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_plots_without_a_run_dir_says_what_it_needs(capsys):
    with pytest.raises(SystemExit) as exit_:
        plots.main([])
    assert exit_.value.code == 2
    assert "run_dir" in capsys.readouterr().err
