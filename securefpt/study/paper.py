"""The paper's own figures (Zhao et al., Multilingual Federated Prompt Tuning), set beside a study's.

Accuracy in percent, XLM-R base, as printed in the paper; "PE_" rows are parameter-efficient.
"""

from __future__ import annotations

# Table 3: MasakhaNEWS.
MASAKHANEWS = {
    "PE_Monolingual": {"eng": 79.08, "fra": 84.91, "hau": 75.18, "swa": 76.64, "yor": 52.8, "avg": 73.7},
    "PE_Centralized": {"eng": 79.81, "fra": 87.10, "hau": 80.78, "swa": 84.18, "yor": 64.48, "avg": 79.3},
    "PE_FL (Prompt Tuning)": {"eng": 82.99, "fra": 89.81, "hau": 65.96, "swa": 86.16, "yor": 57.20, "avg": 76.4},
    "PE_FL (LoRA)": {"eng": 87.10, "fra": 85.64, "hau": 76.64, "swa": 83.21, "yor": 72.50, "avg": 81.0},
}

# Table 1: XGLUE NC, full fine-tuning and parameter-efficient blocks, IID and non-IID federations.
NEWS_CLASSIFICATION = {
    "Monolingual": {"en": 92.4, "es": 84.7, "fr": 79.5, "de": 88.3, "ru": 89.0, "avg": 86.8},
    "Centralized": {"en": 93.9, "es": 86.7, "fr": 82.9, "de": 89.5, "ru": 88.6, "avg": 88.3},
    "FL (IID)": {"en": 94.1, "es": 86.9, "fr": 82.7, "de": 89.4, "ru": 88.8, "avg": 88.4},
    "FL (Non-IID)": {"en": 92.4, "es": 86.3, "fr": 81.2, "de": 88.9, "ru": 84.7, "avg": 86.7},
    "PE_Monolingual": {"en": 82.9, "es": 59.7, "fr": 47.3, "de": 71.4, "ru": 60.0, "avg": 64.3},
    "PE_Centralized": {"en": 89.1, "es": 76.2, "fr": 67.4, "de": 78.8, "ru": 75.9, "avg": 77.5},
    "PE_FL (IID)": {"en": 91.2, "es": 82.2, "fr": 76.5, "de": 86.4, "ru": 81.6, "avg": 83.6},
    "PE_FL (Prompt Tuning) (Non-IID)": {"en": 87.8, "es": 79.2, "fr": 73.7, "de": 83.1, "ru": 79.5, "avg": 80.7},
    "PE_FL (LoRA) (Non-IID)": {"en": 89.3, "es": 76.0, "fr": 75.4, "de": 75.8, "ru": 83.2, "avg": 79.9},
}

# Table 4: NC, 5 clients x 10 rounds, XLM-R base.
COMMUNICATION = {
    "full": {"trainable": 278_655_764, "megabytes": 110_592},
    "prompt_tuning": {"trainable": 1_202_708, "megabytes": 479},
    "lora": {"trainable": 1_491_476, "megabytes": 594},
}
COMMUNICATION_CLIENTS, COMMUNICATION_ROUNDS, COMMUNICATION_LABELS = 5, 10, 10  # NC has 10 classes
