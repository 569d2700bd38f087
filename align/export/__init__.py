"""Turning a run into something other engines load: `merge` (an adapter folded into its base)
and `reward` (a reward adapter and head as a sequence classifier)."""
