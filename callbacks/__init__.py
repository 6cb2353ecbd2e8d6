"""Lightning callbacks of nncurv (``pip install nncurv[lightning]``)."""

__all__: list[str] = []
