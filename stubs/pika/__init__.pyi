"""The part of pika 1.4 that improto uses: parameters, message properties and the Twisted
adapter (pika.adapters.twisted_connection)."""

from pika.connection import ConnectionParameters as ConnectionParameters
from pika.connection import Parameters as Parameters
from pika.connection import URLParameters as URLParameters
from pika.delivery_mode import DeliveryMode as DeliveryMode
from pika.spec import BasicProperties as BasicProperties
