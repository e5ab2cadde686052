"""Public request and response models (the API's boundary, never ORM objects)."""
