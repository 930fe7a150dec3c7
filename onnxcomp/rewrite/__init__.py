"""Pattern-matching rewrite engine: the one way passes find and change subgraphs."""
from .index import GraphIndex
from .driver import Found, RewriteDriver, RewriteStats, RuleStats, apply_rules, find_matches
from .matcher import Match, Matcher
from .pattern import AttrVar, ConstPattern, Pattern, Var
from .rule import DEFAULT_OPSET, GraphBuilder, MatchResult, RewriteContext, RewriteRule, RuleSet, fail, query

__all__ = ["DEFAULT_OPSET", "query", "RewriteRule", "RuleSet", "MatchResult", "fail", "RewriteContext", "GraphBuilder", "Pattern", "Var",
           "ConstPattern", "AttrVar", "Matcher", "Match", "RewriteDriver", "RewriteStats",
           "RuleStats", "apply_rules", "find_matches", "Found", "GraphIndex"]
