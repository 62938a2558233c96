"""Pipeline files for `batchseg build`: YAML reading with line numbers, the schema, the stage configs."""
