"""What a study's rows say: result rows (schema, selection, aggregation), registered claims,
the deployer's verdicts, and the paired contrasts of the ablation and repair families."""
