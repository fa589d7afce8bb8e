"""The studio: a local web page to read co-written episodes and to take the junior's seat.

`python -m tandem.studio RUN_DIR [--senior MODEL]` serves (tandem/studio/__main__.py):

- Episodes: a run's `episodes/step_N.jsonl`, every token coloured by its author, a page at a
  time, filtered by step, reward, senior share and text; a prompt's group side by side
  (episodes.py).
- Runs: the run's metric curves and its reports (`report.md`, `eval/report.md`) with plots.
- Co-write: a person writes the junior's turns with a loaded senior; each session is graded with
  the training reward and saved as an episode row (cowrite.py).

Web code lives in app.py and static/ only; the reading and co-writing logic has no web import.
"""
