"""Display formatters that give run_code results E2B's extra fields.

- ``e2b/data``: a pandas DataFrame as ``{column: [values]}`` (``result.data``).
- ``e2b/chart``: a matplotlib figure's plotted data, via the ``e2b_charts``
  package (``result.chart``: line, bar, scatter, pie, box...).
- ``application/json``: lists and dicts as JSON (``result.json``).

Each formatter looks only at objects whose module is already imported, so
displaying an int never imports pandas or matplotlib.
"""

import sys

from IPython import get_ipython
from IPython.core.formatters import BaseFormatter, JSONFormatter
from traitlets import ObjectName, Unicode


def _plain(value):
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(value, pandas.Timestamp):
        return value.isoformat()
    return value


class DataFrameColumns(BaseFormatter):
    format_type = Unicode("e2b/data")
    print_method = ObjectName("_repr_e2b_data_")
    _return_type = (dict, str)

    def __call__(self, obj):
        pandas = sys.modules.get("pandas")
        if pandas is None or not isinstance(obj, pandas.DataFrame):
            return super().__call__(obj)
        columns = obj.to_dict(orient="list")
        return {str(name): [_plain(v) for v in values] for name, values in columns.items()}


class FigureChart(BaseFormatter):
    format_type = Unicode("e2b/chart")
    print_method = ObjectName("_repr_e2b_chart_")
    _return_type = (dict, str)

    def __call__(self, obj):
        if "matplotlib" not in sys.modules:
            return super().__call__(obj)
        from matplotlib.figure import Figure

        if not isinstance(obj, Figure):
            return super().__call__(obj)
        try:
            from e2b_charts import chart_figure_to_dict

            return chart_figure_to_dict(obj)
        except Exception:
            # A figure e2b_charts cannot read is still shown as an image.
            return None


class ContainerJSON(JSONFormatter):
    def __call__(self, obj):
        if isinstance(obj, (list, dict)):
            try:
                import orjson

                data = orjson.loads(
                    orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
                )
                return data, {"expanded": True}
            except TypeError:
                pass
        return super().__call__(obj)


_formatter = get_ipython().display_formatter
_formatter.formatters["e2b/data"] = DataFrameColumns(parent=_formatter)
_formatter.formatters["e2b/chart"] = FigureChart(parent=_formatter)
_formatter.formatters["application/json"] = ContainerJSON(parent=_formatter)
