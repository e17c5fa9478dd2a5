"""Feature dashboards (HTML pages) and the Neuronpedia export."""
