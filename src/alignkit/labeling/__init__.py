"""Human feedback: a web app where labelers rank model responses (``app``), the database it keeps them in
(``storage``), and the preference pairs made from them (``export``). The stage is ``alignkit label``
(``alignkit.stages.label``): ``label serve``, ``label tokens``, ``label export``.
"""
