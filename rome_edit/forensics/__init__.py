"""Edit forensics: find ROME-family edits in a model's weights, name their subjects, undo them.

``detect``: compare an edited model with its original layer by layer, recover each rank-one
edit's key direction, match it to candidate subjects, and revert.
"""
