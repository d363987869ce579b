"""Views of a sweep logged to MLflow: the Pareto front as ``pareto.csv`` (``pareto_csv``), ``pareto.png``
(``pareto_png``) and a self-contained ``pareto.html`` (``pareto_html``), all drawn from one scene (``scene``);
the per-layer view of one compressed model (``layer_html``); the poster's published results to compare with
(``poster_reference``).

A leaf package: of the library it imports only ``trainables.contract`` (the result keys), never ``sweep``,
torch, Ray or MLflow.
"""
