//! Datasets users already have (sharegpt / messages JSON and JSONL) and the paper's perturbations.
