"""lowrank inside other trainers: ``lowrank.integrations.axolotl`` (an Axolotl plugin) and
``lowrank.integrations.llamafactory`` (a TrainerCallback and an entry point taking
``llamafactory-cli train``'s YAML). Each imports its framework only when used."""
