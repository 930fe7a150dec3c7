"""Pattern-matching rewrite engine: the one way passes find and change subgraphs."""
from .index import GraphIndex
from .driver import Found, RewriteDriver, RewriteStats, RuleStats, apply_rules, find_matches
from .matcher import Match, Matcher
from .plan import Plan
from .pattern import AttrVar, ConstPattern, Pattern, Var
from .sweeps import dedupe_initializers, fold_constant_subgraphs, remove_dead_nodes, take_back_names
from .rule import DEFAULT_OPSET, GraphBuilder, MatchResult, RewriteContext, RewriteRule, RuleSet, fail, query

__all__ = ["DEFAULT_OPSET", "query", "RewriteRule", "RuleSet", "MatchResult", "fail", "RewriteContext", "GraphBuilder", "Pattern", "Var",
           "ConstPattern", "AttrVar", "Matcher", "Match", "RewriteDriver", "RewriteStats",
           "RuleStats", "apply_rules", "find_matches", "Found", "GraphIndex", "Plan",
           "dedupe_initializers", "fold_constant_subgraphs", "remove_dead_nodes", "take_back_names"]
