"""The service's routes, one router per area; ``create_app`` includes them all."""

from histolite.serve.routes import health, models, page, predictions, slides

ROUTERS = (predictions.router, models.router, slides.router, health.router, page.router)

__all__ = ["ROUTERS"]
