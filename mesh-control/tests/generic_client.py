#!/usr/bin/env python3
"""A generic gRPC client against mesh-control, as an operator's own tooling
would be: Python grpcio with grpcio-reflection (which speaks reflection
v1alpha), trusting control's ca.pem and sending an admin token.

It lists the services by reflection, builds AdminService/GetStatus's
messages from the descriptors control serves (no generated code), calls it
with the token, and prints one JSON line: the services, and the status's
fields. Without a token the call must fail with UNAUTHENTICATED.
Run by generic_client.rs.
"""
import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--token-file", required=True)
    args = ap.parse_args()
    with open(args.ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with open(args.token_file) as f:
        token = f.read().strip()
    with grpc.secure_channel(args.addr, creds) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindMethodByName("mesh.v1.AdminService.GetStatus")
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/mesh.v1.AdminService/GetStatus",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        try:
            call(req_cls(), timeout=10)
            unauthenticated = "no error"
        except grpc.RpcError as e:
            unauthenticated = e.code().name
        status = call(req_cls(), metadata=[("authorization", "Bearer " + token)], timeout=10)
        print(
            json.dumps(
                {
                    "services": services,
                    "without_token": unauthenticated,
                    "status": json_format.MessageToDict(status, preserving_proto_field_name=True),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
