"""URLs of the test Django project: a plain route, converters, an include()."""

from django.urls import include, path

from django_site import views

articles = [path("<int:year>/<slug:slug>/", views.article)]

urlpatterns = [
    path("", views.root),
    path("items/<int:item_id>", views.item),
    path("articles/", include(articles)),
    path("fail", views.fail),
    path("charged", views.charged),
]
