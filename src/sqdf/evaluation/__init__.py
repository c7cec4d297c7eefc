"""What a run is measured with: pure metrics of sample sets (objective terms, mode weights, energy distance, kNN
entropy and KL) and the plots of samples and evaluation curves."""
