"""The gender-vector study on the bundled toy model, built on the generic toolkit.

Everything that knows about names and genders lives here: the names list (``names``, with
``names.csv``), the bundled model's synthetic world (``corpus``: every name's gender, city and
profession — also the bundled model's statistics corpus), the task in the toolkit's terms
(``task``: prompts, answers, requests, labels, held-out tasks), the gender sweep (``sweep``),
what the model knows (``knowledge``), the study's analysis (``experiment``), ``rome-edit demo``
(``demo``) and the study's ``rome-edit`` commands (``commands``: locate, calibrate, sweep,
analyze, apply, demo).  The toolkit below (models, tracing, stats, editing, analysis) never
imports it, with one exception: ``rome_edit.stats.corpus`` reads ``corpus`` and ``names``
(stdlib-only data) to regenerate the bundled model's training text; of the commands, only
``rome_edit.cli.main`` imports ``commands``, to register them.
"""
