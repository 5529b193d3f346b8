"""MLflow model registry: promotion by aliases (`promote`) and text->image search (`search`)."""
