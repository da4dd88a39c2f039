"""A study's report: its data as DataFrames (`data`) and the self-contained HTML (`html`)."""
