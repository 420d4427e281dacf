# IPython kernel settings of the code interpreter (sandmesh).
c = get_config()  # noqa: F821

# Tracebacks are sent to API callers as text: no terminal colours.
c.InteractiveShell.colors = "nocolor"
# A result's text is the whole value, not "[1, 2, ..., 999]".
c.PlainTextFormatter.max_seq_length = 0
