"""Generation: sampling with a delta attached, generators over saved runs, prompt files, generation metrics."""
