"""`preset: auto`: generate candidate recipes from what the model contains, measure each (accuracy on held-back
data, size, latency on the target), keep the Pareto front, return the best on the objective that meets the
budget."""
from .candidates import Candidate, ModelFacts, candidates, model_facts
from .pareto import choose, pareto_front
from .search import SearchResult, Trial, search

__all__ = ["Candidate", "ModelFacts", "SearchResult", "Trial", "candidates", "choose", "model_facts",
           "pareto_front", "search"]
