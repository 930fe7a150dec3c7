"""Pattern-matching rewrite engine: the one way passes find and change subgraphs."""
from .driver import Found, RewriteDriver, RewriteStats, RuleStats, apply_rules, find_matches
from .matcher import Match, MatchFailure, Matcher
from .pattern import AttrVar, ConstPattern, Pattern, Var
from .rule import GraphBuilder, MatchResult, RewriteContext, RewriteRule, RuleSet, fail

__all__ = ["RewriteRule", "RuleSet", "MatchResult", "fail", "RewriteContext", "GraphBuilder", "Pattern", "Var",
           "ConstPattern", "AttrVar", "Matcher", "Match", "MatchFailure", "RewriteDriver", "RewriteStats",
           "RuleStats", "apply_rules", "find_matches", "Found"]
